"""Mooncake traces (``/work/shared/traces``): JSONL of timestamp, lengths and prefix block ids.

Each line is one request: ``timestamp`` (ms from the start), ``input_length`` and
``output_length`` in tokens, and ``hash_ids``, one id per 512-token prefix block (the last
block may be partial). Equal ids mean a reusable prefix, so each id becomes one fixed block
of text; the same id is the same text in every request, which is what lets a worker's prefix
cache (and a cache-aware router) find the sharing the trace recorded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from sglctl.bench.workload import BenchRequest, Segment, Workload

BLOCK_TOKENS = 512


class TraceFormatError(ValueError):
    """A trace line is not what the Mooncake format says; the message names the line."""


@dataclass(frozen=True)
class TraceRecord:
    """One line of a Mooncake trace."""

    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def parse_record(line: str, lineno: int, block_tokens: int = BLOCK_TOKENS) -> TraceRecord:
    """Parse and check one JSONL line (``lineno`` is 1-based, for the error message)."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceFormatError(f"line {lineno}: not JSON ({exc.msg})") from None
    if not isinstance(raw, dict):
        raise TraceFormatError(f"line {lineno}: expected a JSON object")
    try:
        timestamp = float(raw["timestamp"])
        input_length = int(raw["input_length"])
        output_length = int(raw["output_length"])
        hash_ids = tuple(int(h) for h in raw["hash_ids"])
    except KeyError as exc:
        raise TraceFormatError(f"line {lineno}: missing field {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise TraceFormatError(f"line {lineno}: bad field value ({exc})") from None
    if input_length <= 0 or output_length < 0:
        raise TraceFormatError(f"line {lineno}: lengths must be positive")
    if math.ceil(input_length / block_tokens) != len(hash_ids):
        raise TraceFormatError(
            f"line {lineno}: {len(hash_ids)} hash ids for {input_length} input tokens "
            f"(expected ceil({input_length}/{block_tokens}))"
        )
    return TraceRecord(timestamp, input_length, output_length, hash_ids)


def load_trace(
    path: str | Path, limit: int | None = None, block_tokens: int = BLOCK_TOKENS
) -> list[TraceRecord]:
    """Read the first ``limit`` records (all for None) of a trace file; blank lines are skipped."""
    records: list[TraceRecord] = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if limit is not None and len(records) >= limit:
                break
            if line.strip():
                records.append(parse_record(line, lineno, block_tokens))
    return records


def record_segments(record: TraceRecord, block_tokens: int = BLOCK_TOKENS) -> tuple[Segment, ...]:
    """One segment per hash id; the last one is cut so the total is ``input_length``."""
    segments = []
    for position, hash_id in enumerate(record.hash_ids):
        tokens = min(block_tokens, record.input_length - position * block_tokens)
        segments.append(Segment(f"trace-{hash_id}", tokens, block_tokens))
    return tuple(segments)


def trace_workload(
    path: str | Path, limit: int | None = None, block_tokens: int = BLOCK_TOKENS
) -> Workload:
    """The trace as a workload: arrivals at the trace's timestamps (seconds, before speed-up).

    Records with ``output_length`` 0 ask for one token: a generation of nothing has no
    time to first token to measure.
    """
    records = load_trace(path, limit, block_tokens)
    start = records[0].timestamp_ms if records else 0.0
    requests = tuple(
        BenchRequest(
            index=i,
            segments=record_segments(rec, block_tokens),
            output_tokens=max(rec.output_length, 1),
            arrival=(rec.timestamp_ms - start) / 1000.0,
        )
        for i, rec in enumerate(records)
    )
    params: dict[str, object] = {"path": str(path), "requests": len(requests)}
    return Workload(f"trace:{Path(path).name}", requests, params)
