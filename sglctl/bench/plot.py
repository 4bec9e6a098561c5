"""Optional figure of a run (``--plot OUT.png``); needs the ``plot`` extra (matplotlib).

Three panels: the TTFT distribution (CDF), end-to-end latency against send time (to see the
run settle or degrade), and each worker's share of requests and tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sglctl.bench.runner import BenchResult


class PlotUnavailableError(RuntimeError):
    """matplotlib is not installed."""


def plot_result(result: BenchResult, path: str | Path) -> None:
    """Write the figure of ``result`` to ``path`` (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailableError("--plot needs matplotlib: pip install 'sglctl[plot]'") from exc

    done = [r for r in result.results if r.ok]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ttfts = sorted(r.ttft * 1000 for r in done if r.ttft is not None)
    if ttfts:
        axes[0].plot(ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))])
    axes[0].set(title="TTFT CDF", xlabel="ms", ylabel="fraction of requests")
    axes[0].grid(alpha=0.3)

    timed = [(r.start, r.latency * 1000) for r in done if r.latency is not None]
    axes[1].scatter([t for t, _ in timed], [ms for _, ms in timed], s=4)
    axes[1].set(title="end-to-end latency", xlabel="send time (s)", ylabel="ms")
    axes[1].grid(alpha=0.3)

    workers = result.summary.workers
    if workers:
        total_req = sum(w.requests for w in workers) or 1.0
        total_tok = sum(w.tokens for w in workers) or 1.0
        xs = range(len(workers))
        axes[2].bar(
            [x - 0.2 for x in xs], [w.requests / total_req for w in workers], 0.4, label="requests"
        )
        axes[2].bar(
            [x + 0.2 for x in xs], [w.tokens / total_tok for w in workers], 0.4, label="tokens"
        )
        axes[2].axhline(1 / len(workers), color="grey", linestyle="--", linewidth=1)
        axes[2].set_xticks(list(xs), [w.url.rsplit(":", 1)[-1] for w in workers], rotation=45)
        axes[2].legend()
    axes[2].set(title="per-worker share", xlabel="worker port")
    fig.suptitle(f"{result.workload.name} via {result.config.url}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
