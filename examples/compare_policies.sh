#!/usr/bin/env bash
# Compare routing policies on a shared-prefix workload with four simulated workers.
# Everything runs on 127.0.0.1 and stops by itself. Usage: examples/compare_policies.sh
set -euo pipefail
SGLCTL=${SGLCTL:-sglctl}
PORT=${PORT:-30100}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

urls=()
for i in 0 1 2 3; do
  port=$((PORT + 10 + i))
  # a small KV cache, so that where a prompt goes decides whether its prefix is still cached
  $SGLCTL sim-worker --port "$port" --kv-cache-tokens 20000 --speedup 20 --log-level warning &
  pids+=($!)
  urls+=("http://127.0.0.1:$port")
done

for policy in cache_aware round_robin power_of_two; do
  $SGLCTL router --port "$PORT" --metrics-port $((PORT + 1)) --worker-urls "${urls[@]}" \
    --policy "$policy" --log-level warning &
  router=$!
  until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do sleep 0.2; done
  curl -sf -X POST "http://127.0.0.1:$PORT/flush_cache" >/dev/null
  echo "== $policy"
  $SGLCTL bench --router "http://127.0.0.1:$PORT" --workload shared-prefix \
    --concurrency 16 --max-requests 256 --speedup 20
  kill "$router"; wait "$router" 2>/dev/null || true
done
