#!/usr/bin/env bash
# The same command line works for both routers: only the program name changes.
# Usage: examples/switch_from_sglang_router.sh http://worker-a:30000 http://worker-b:30000
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 WORKER_URL ..." >&2; exit 2; }
FLAGS=(--host 127.0.0.1 --port 30000 --policy cache_aware --cache-threshold 0.5
       --balance-abs-threshold 32 --balance-rel-threshold 1.0001 --max-payload-size 10485760)

# before: python -m sglang_router.launch_router --worker-urls "$@" "${FLAGS[@]}"
exec sglctl router --worker-urls "$@" "${FLAGS[@]}"
