"""``sglctl up --kv-events``: every worker publishes its KV cache events on its own ports and
the router it starts follows them all (issue 16: the mechanism works under ``sglctl up``)."""

from __future__ import annotations

import random
from pathlib import Path

import httpx
from test_up import up_runner

from sglctl.fourchar import text_for_tokens
from sglctl.net import find_free_port_block
from tests.support import wait_until


def test_up_with_kv_events_has_its_router_follow_every_worker(tmp_path: Path) -> None:
    events_base = find_free_port_block(4, start=random.randrange(20000, 30000, 10))
    with up_runner(tmp_path) as start, httpx.Client(timeout=30) as client:
        up = start("--kv-events", "--kv-events-base-port", str(events_base))

        def feeds() -> dict[str, dict[str, object]]:
            return dict(client.get(up.url + "/stats").json().get("kv_events") or {})

        wait_until(
            lambda: len(feeds()) == 2 and all(f["connected"] for f in feeds().values()),
            timeout=60,
            what="the router subscribed to both workers' KV events",
        )
        endpoints = sorted(str(f["endpoint"]) for f in feeds().values())
        assert endpoints == [
            f"tcp://127.0.0.1:{events_base}",
            f"tcp://127.0.0.1:{events_base + 2}",
        ]
        # A prompt of 8 pages (sglctl up gives event-publishing workers --page-size 64) is
        # indexed under the worker that served it, and the same prefix then goes there.
        prompt = text_for_tokens(512, seed=7)
        first = client.post(
            up.url + "/generate", json={"text": prompt, "sampling_params": {"max_new_tokens": 1}}
        )
        assert first.status_code == 200, first.text
        served = first.headers["x-sglctl-worker"]
        wait_until(
            lambda: int(feeds()[served]["blocks"]) >= 8,  # type: ignore[call-overload]
            timeout=30,
            what=f"the router indexing {served}'s 8 pages",
        )
        again = client.post(
            up.url + "/generate",
            json={"text": prompt + " and more", "sampling_params": {"max_new_tokens": 1}},
        )
        assert again.status_code == 200, again.text
        assert again.headers["x-sglctl-worker"] == served
        assert again.json()["meta_info"]["cached_tokens"] >= 512
        assert up.interrupt() == 0
        up.assert_nothing_left()
