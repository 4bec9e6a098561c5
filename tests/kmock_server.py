"""A stand-in Kubernetes API server for the discovery tests: kmock's emulator in its own process.

No kube-apiserver can be installed here, and the discovery tests must talk to a real HTTP server
in another process (a patched client would test nothing of the list/watch protocol). kmock's
``KubernetesEmulator`` speaks the REST and watch protocol for any resource and keeps objects in
memory; it has no command line, so this script serves it over HTTP::

    python tests/kmock_server.py --host 127.0.0.1 --port 8001

and prints ``ready http://HOST:PORT`` on stdout once it listens. Besides the Kubernetes API it
answers two test-only control calls, which do what a real API server does on its own now and
then and which no client call can provoke:

* ``POST /_control/cut-watches`` ends every open watch stream cleanly (the server closing a
  watch after its timeout, or a load balancer recycling the connection);
* ``POST /_control/gone?count=N`` answers the next N watch requests with the ``ERROR`` event a
  real server sends when the requested resourceVersion is too old (``410 Gone``);
* ``POST /_control/forget?namespace=NS&name=N`` drops a pod without a watch event (a change
  a client missed while its history was compacted: only a relist finds it out).

What the emulator does not do (so the router must not rely on it): filter by label selector.
This script adds what list+watch clients depend on and the emulator lacks: resourceVersions on
lists and events, and watches that replay the events after a given version (see
:class:`VersionedBus`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import signal
from collections.abc import AsyncIterator
from typing import Any

import aiohttp.web
import attrs
import kmock

GONE_EVENT = {
    "type": "ERROR",
    "object": {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": "too old resource version",
        "reason": "Expired",
        "code": 410,
    },
}


#: The last resourceVersion handed out (one emulator per process, one counter for all kinds).
_last_version = 0


@attrs.define
class VersionedBus(kmock.Bus[Any]):
    """The emulator's event bus, plus what it lacks: resourceVersions and their history.

    Every event gets the next version (in ``object.metadata.resourceVersion``) and is kept,
    so a watch from version N replays what came after N, as a real API server does. Without
    this, a change made between a client's list and its watch (or while a cut watch was
    being re-opened) was lost, and tests flaked on what a real server gets right.
    """

    history: list[tuple[int, dict[str, Any]]] = attrs.field(factory=list, init=False)

    async def put(self, *items: Any) -> None:
        global _last_version
        stamped = []
        for item in items:
            _last_version += 1
            obj = dict(item.get("object") or {})
            obj["metadata"] = {**obj.get("metadata", {}), "resourceVersion": str(_last_version)}
            event = {**item, "object": obj}
            self.history.append((_last_version, event))
            stamped.append(event)
        await super().put(*stamped)


@attrs.define(kw_only=True)
class ControlledEmulator(kmock.KubernetesEmulator):
    """The emulator plus the two server-side events the tests need to provoke."""

    cut: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    gone_pending: int = attrs.field(default=0, init=False)
    watches_served: int = attrs.field(default=0, init=False)

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        self.watches_served += 1
        if self.gone_pending > 0:
            self.gone_pending -= 1
            yield b""
            yield GONE_EVENT
            return
        cut = self.cut
        events = self._watch_events(request).__aiter__()
        next_event: asyncio.Future[Any] | None = None
        try:
            while True:
                next_event = asyncio.ensure_future(events.__anext__())
                cut_wait = asyncio.ensure_future(cut.wait())
                done, _ = await asyncio.wait(
                    {next_event, cut_wait}, return_when=asyncio.FIRST_COMPLETED
                )
                cut_wait.cancel()
                if next_event not in done:
                    return
                try:
                    event = next_event.result()
                except StopAsyncIteration:
                    return
                yield event
        finally:
            # Also when the client went away and this handler is cancelled mid-wait.
            if next_event is not None and not next_event.done():
                next_event.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await next_event
            await events.aclose()  # type: ignore[attr-defined]

    async def _watch_events(self, request: Any) -> AsyncIterator[Any]:
        """The emulator's watch with resourceVersions and without its gap.

        The emulator lists the objects and only then subscribes to changes, so a change made
        in between was lost (seen with 3 watchers). Here the bus position is marked under the
        lock every change is made under. With ``resourceVersion=N`` the events after N are
        replayed; without, the current objects come as ``ADDED``, as from a real server.
        """
        yield b""  # send the headers now, as the emulator does
        bus = self._buses[request.resource]
        since = request.params.get("resourceVersion") if request.params else None
        async with self._lock:
            mark = await bus.mark()
            if since and since.isdigit():
                first = [e for v, e in getattr(bus, "history", []) if v > int(since)]
            else:
                first = [
                    {"type": "ADDED", "object": obj.raw}
                    for (resource, namespace, name), obj in self._objects.items()
                    if not obj.deleted and self._selected(request, resource, namespace, name)
                ]
        try:
            for event in first:
                if self._selected_event(request, event):
                    yield event
            async for event in mark:
                if self._selected_event(request, event):
                    yield event
        finally:
            await bus.unmark(mark)

    async def _serve_list(self, request: Any) -> Any:
        """The emulator's list, with the resourceVersion it was taken at (read under the lock
        every change is made under, so a watch from it misses nothing)."""
        async with self._lock:
            version = _last_version
            items = [
                obj.raw
                for (resource, namespace, name), obj in self._objects.items()
                if not obj.deleted and self._selected(request, resource, namespace, name)
            ]
        return {"kind": "PodList", "metadata": {"resourceVersion": str(version)}, "items": items}

    def _selected_event(self, request: Any, event: dict[str, Any]) -> bool:
        meta = event.get("object", {}).get("metadata", {})
        return self._selected(request, request.resource, meta.get("namespace"), meta.get("name"))

    @staticmethod
    def _selected(request: Any, resource: Any, namespace: str | None, name: str) -> bool:
        return bool(
            resource == request.resource
            and (request.namespace is None or namespace == request.namespace)
            and (request.name is None or name == request.name)
        )

    def cut_watches(self) -> None:
        """End every open watch stream now; later watches are not affected."""
        self.cut.set()
        self.cut = asyncio.Event()


async def serve(host: str, port: int) -> None:
    emulator = ControlledEmulator(buses=collections.defaultdict(VersionedBus))
    emulator.resources["v1/pods"] = kmock.ResourceInfo(
        kind="Pod",
        singular="pod",
        namespaced=True,
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
        subresources={"status"},
    )

    async def dispatch(raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if raw.path == "/_control/cut-watches" and raw.method == "POST":
            emulator.cut_watches()
            return aiohttp.web.json_response({"status": "ok"})
        if raw.path == "/_control/gone" and raw.method == "POST":
            emulator.gone_pending += int(raw.query.get("count", "1"))
            return aiohttp.web.json_response({"status": "ok"})
        if raw.path == "/_control/forget" and raw.method == "POST":
            # Drop a pod without a watch event: what a client misses when the server compacts
            # history while its watch is down (only a relist can tell it is gone).
            del emulator.objects["v1/pods", raw.query["namespace"], raw.query["name"]]
            return aiohttp.web.json_response({"status": "ok"})
        if raw.path == "/_control/stats":
            return aiohttp.web.json_response({"watches_served": emulator.watches_served})
        return await emulator(raw)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with emulator:
        runner = aiohttp.web.ServerRunner(aiohttp.web.Server(dispatch), shutdown_timeout=1)
        await runner.setup()
        site = aiohttp.web.TCPSite(runner, host, port)
        await site.start()
        print(f"ready http://{host}:{port}", flush=True)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
