#!/usr/bin/env bash
# Compare routing policies on a shared-prefix workload with four simulated workers.
# Everything runs on 127.0.0.1 and stops by itself. Usage: examples/compare_policies.sh
# (from a fresh clone after `python3 -m venv .venv && .venv/bin/pip install -e .`; no need to
# activate the venv; SGLCTL=... names another sglctl).
set -euo pipefail
. "$(dirname "$0")/find_sglctl.sh"
PORT=${PORT:-30100}                           # router; PORT+1 its metrics
WORKER_BASE_PORT=${WORKER_BASE_PORT:-31100}   # workers on WORKER_BASE_PORT .. +3
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# Wait (at most 30 s) for URL to answer 200 while process PID lives.
wait_healthy() {
  local url=$1 pid=$2
  for _ in $(seq 150); do
    curl -sf "$url" >/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || { echo "error: the process behind $url exited (see its output above; a port taken? set PORT and WORKER_BASE_PORT)" >&2; return 1; }
    sleep 0.2
  done
  echo "error: $url did not become healthy within 30 s" >&2
  return 1
}

urls=()
for i in 0 1 2 3; do
  port=$((WORKER_BASE_PORT + i))
  # a small KV cache, so that where a prompt goes decides whether its prefix is still cached
  $SGLCTL sim-worker --port "$port" --kv-cache-tokens 20000 --speedup 20 --log-level warning &
  pids+=($!)
  urls+=("http://127.0.0.1:$port")
done
for i in 0 1 2 3; do wait_healthy "${urls[$i]}/health" "${pids[$i]}"; done

for policy in least_ttft cache_aware round_robin power_of_two; do
  $SGLCTL router --port "$PORT" --metrics-port $((PORT + 1)) --worker-urls "${urls[@]}" \
    --policy "$policy" --log-level warning &
  router=$!
  wait_healthy "http://127.0.0.1:$PORT/health" "$router"
  curl -sf -X POST "http://127.0.0.1:$PORT/flush_cache" >/dev/null
  echo "== $policy"
  $SGLCTL bench --router "http://127.0.0.1:$PORT" --workload shared-prefix \
    --concurrency 16 --max-requests 256 --speedup 20
  kill "$router"; wait "$router" 2>/dev/null || true
done
