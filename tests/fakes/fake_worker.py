"""A tiny stand-in for a worker process, for supervision tests (starts in ~50 ms).

``python fake_worker.py --port P [--fork-child] [--exit-after S] [--exit-code N]
[--never-healthy] [--unhealthy-after S] [--ignore-term]``: serves ``GET /health`` (200, or
503 when told to be unhealthy) and ``POST /generate`` (a fixed JSON answer). ``--fork-child``
starts a grandchild that sleeps, to check that whole process trees are stopped; its pid is
printed as ``grandchild <pid>``.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--fork-child", action="store_true")
    p.add_argument("--exit-after", type=float, default=None)
    p.add_argument("--exit-code", type=int, default=3)
    p.add_argument("--never-healthy", action="store_true")
    p.add_argument("--unhealthy-after", type=float, default=None)
    p.add_argument("--ignore-term", action="store_true")
    args, _ = p.parse_known_args()
    started = time.monotonic()

    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.fork_child:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        print(f"grandchild {child.pid}", flush=True)

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: dict[str, object]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            unhealthy = args.never_healthy or (
                args.unhealthy_after is not None
                and time.monotonic() - started > args.unhealthy_after
            )
            if self.path == "/health":
                self._reply(503 if unhealthy else 200, {})
            else:
                self._reply(404, {"error": "not found"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            self._reply(200, {"text": "ok", "meta_info": {"port": args.port}})

        def log_message(self, *a: object) -> None:
            pass

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    if args.exit_after is not None:

        def _exit() -> None:
            time.sleep(args.exit_after)
            print(f"fake worker exiting with code {args.exit_code}", flush=True)
            import os

            os._exit(args.exit_code)

        threading.Thread(target=_exit, daemon=True).start()
    print(f"fake worker listening on {args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
