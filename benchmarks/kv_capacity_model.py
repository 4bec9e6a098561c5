#!/usr/bin/env python3
"""Offline model: how much of the ideal hit ratio can a router reach for a given KV size?

Used to choose ``--kv-cache-tokens`` for ``compare_routers.py``. Each worker is an LRU cache of
prefix paths (512-token blocks) holding at most ``kv`` tokens; requests are replayed in trace
order with no timing and no in-flight reservations. Two routers: round robin, and "affinity",
an oracle that sends a request to the worker holding its longest cached prefix when that covers
at least half of the prompt, else to the worker that has served the fewest requests. The
affinity figure is an optimistic ceiling for a cache-aware router at that KV size.

    python benchmarks/kv_capacity_model.py --max-requests 1000 --kv 444500,1000000,1500000
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sglctl.bench.ideal import ideal_hit_ratio  # noqa: E402
from sglctl.bench.workloads.trace import BLOCK_TOKENS, load_trace, trace_workload  # noqa: E402


def model(records: list, kv: int, workers: int, policy: str) -> tuple[float, float]:
    """(hit ratio, max/mean requests) of ``policy`` over LRU caches of ``kv`` tokens."""
    caches: list[OrderedDict[tuple[int, ...], int]] = [OrderedDict() for _ in range(workers)]
    used = [0] * workers
    served = [0] * workers
    hit = total = 0
    for i, rec in enumerate(records):
        paths = [tuple(rec.hash_ids[: j + 1]) for j in range(len(rec.hash_ids))]

        def matched(w: int, paths: list[tuple[int, ...]] = paths) -> int:
            k = 0
            for path in paths:
                if path not in caches[w]:
                    break
                k += 1
            return k

        if policy == "round_robin":
            w = i % workers
        else:
            matches = [matched(w) for w in range(workers)]
            best = max(matches)
            if best and best * BLOCK_TOKENS >= rec.input_length / 2:
                w = max(range(workers), key=lambda w: (matches[w], -served[w]))
            else:
                w = min(range(workers), key=lambda w: served[w])
        hit += min(BLOCK_TOKENS * matched(w), rec.input_length)
        total += rec.input_length
        served[w] += 1
        cache = caches[w]
        for j, path in enumerate(paths):
            if path in cache:
                cache.move_to_end(path)
            else:
                size = min(BLOCK_TOKENS, rec.input_length - j * BLOCK_TOKENS)
                cache[path] = size
                used[w] += size
        while used[w] > kv:
            _, size = cache.popitem(last=False)
            used[w] -= size
    return hit / total, max(served) / (sum(served) / workers)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--trace", default=str(REPO.parent / "shared" / "traces" / "conversation_trace.jsonl")
    )
    parser.add_argument("--max-requests", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument(
        "--kv", default="444500,1000000,1500000", help="Comma-separated KV sizes (tokens)."
    )
    args = parser.parse_args()
    records = load_trace(args.trace, limit=args.max_requests)
    ideal = ideal_hit_ratio(
        trace_workload(args.trace, limit=args.max_requests).requests
    ).token_weighted
    distinct = len({h for rec in records for h in rec.hash_ids})
    print(
        f"{len(records)} requests, {distinct} distinct blocks "
        f"({distinct * BLOCK_TOKENS:,} tokens), ideal {ideal:.3f}"
    )
    print(f"{'kv tokens':>12} {'affinity':>9} {'of ideal':>9} {'round robin':>12} {'of ideal':>9}")
    for kv in (int(x) for x in args.kv.split(",")):
        aff, _ = model(records, kv, args.workers, "affinity")
        rr, _ = model(records, kv, args.workers, "round_robin")
        print(f"{kv:>12,} {aff:>9.3f} {aff / ideal:>9.0%} {rr:>12.3f} {rr / ideal:>9.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
