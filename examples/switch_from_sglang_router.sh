#!/usr/bin/env bash
# The same command line works for both routers: only the program name changes.
# Usage: examples/switch_from_sglang_router.sh http://worker-a:30000 http://worker-b:30000
# (from a fresh clone after `python3 -m venv .venv && .venv/bin/pip install -e .`; no need to
# activate the venv. PORT=... and METRICS_PORT=... to listen elsewhere than 30000 and 29000.)
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 WORKER_URL ..." >&2; exit 2; }
. "$(dirname "$0")/find_sglctl.sh"
FLAGS=(--host 127.0.0.1 --port "${PORT:-30000}" --policy cache_aware --cache-threshold 0.5
       --balance-abs-threshold 32 --balance-rel-threshold 1.0001 --max-payload-size 10485760
       --metrics-port "${METRICS_PORT:-29000}")

# before: python -m sglang_router.launch_router --worker-urls "$@" "${FLAGS[@]}"
# shellcheck disable=SC2086  # SGLCTL may be a command with arguments ("python -m sglctl")
exec $SGLCTL router --worker-urls "$@" "${FLAGS[@]}"
