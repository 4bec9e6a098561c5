"""How long a simulated GPU takes: prefill batches and decode steps of continuous batching.

Calibration (defaults): one H100 SXM 80 GB serving Llama-3.1-8B-Instruct in BF16 with SGLang.

Figures from public sources, and what they give:

* Model: 8.03 B parameters, 32 layers, hidden size 4096, 8 KV heads of dimension 128 (Llama-3.1-8B
  config). Weights: 16.1 GB. KV cache per token: 2 (K, V) x 32 layers x 8 heads x 128 x 2 bytes
  = 128 KiB.
* H100 SXM: 989 TFLOPS dense BF16, 3.35 TB/s HBM3 (NVIDIA datasheet).
* A real SGLang start-up log of this model on an 80 GB GPU (SGLang docs notebook, Jan 2025):
  ``max_total_num_tokens=444500, max_prefill_tokens=16384, max_running_requests=2049,
  context_len=131072`` and a single-stream decode throughput of about 144 tokens/s.

Derived model (``t`` in seconds of GPU time, before ``--speedup``):

* **Prefill** of a batch: ``prefill_base + per_token x new_tokens + per_pair x attention pairs``.
  Linear layers cost 2 x 8.03 GFLOP a token; at ~50 % of peak (495 TFLOPS) that is 32 us a
  token (about 31k tokens/s, in line with published SGLang prefill throughput for 8B models on
  H100). Attention costs 4 x hidden x layers = 0.52 MFLOP per (query, key) pair, i.e. 1.06 ns
  a pair at the same efficiency; a request with ``c`` cached and ``n`` new tokens has
  ``n x c + n x (n + 1) / 2`` pairs, so a cached prefix is skipped for the linear part but still
  read by attention, as on a GPU. A fixed 8 ms a batch covers launch, sampling and scheduling
  overhead (real TTFT of a short prompt on an idle H100 is ~10-20 ms).
* **Decode step** of a batch of ``b`` requests holding ``k`` tokens of context in total:
  ``decode_base + per_seq x b + per_ctx_token x k``. Reading the weights once a step at ~75 %
  of HBM bandwidth is 6.4 ms, which matches the ~144 tokens/s single-stream figure (6.9 ms a
  step incl. scheduling). Each extra sequence adds ~30 us of compute (2 x 8 GFLOP at ~55 % of
  peak); each token of context adds a 128 KiB KV read, 49 ns at ~80 % bandwidth. A full pool
  (444k tokens) makes the KV term ~22 ms, so a step runs 6.5 ms (batch 1) to ~90 ms (huge
  batch, full cache), i.e. ~150 to ~5000 output tokens/s, the range real SGLang shows.
* **Scheduling** follows SGLang's defaults: prefill has priority over decode, prompts are cut
  into chunks of ``chunked_prefill_size`` (8192) tokens, at most ``max_prefill_tokens``
  (16384) new tokens a prefill batch, and the KV pool is ``max_total_num_tokens`` (444500).

Everything is divided by ``--speedup`` to get wall-clock time. In PD mode the KV hand-over
between a prefill and a decode worker has its own model, in :mod:`sglctl.sim.transfer`.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_KV_CACHE_TOKENS = 444_500
DEFAULT_MAX_RUNNING_REQUESTS = 2049
DEFAULT_CHUNKED_PREFILL_SIZE = 8192
DEFAULT_MAX_PREFILL_TOKENS = 16384
DEFAULT_CONTEXT_LENGTH = 131_072


@dataclass(frozen=True)
class TimingModel:
    """Simulated GPU time of prefill batches and decode steps (seconds, before speed-up)."""

    prefill_base_s: float = 0.008
    prefill_per_token_s: float = 32e-6
    prefill_per_pair_s: float = 1.06e-9
    decode_base_s: float = 0.0065
    decode_per_seq_s: float = 30e-6
    decode_per_ctx_token_s: float = 49e-9
    speedup: float = 1.0

    def __post_init__(self) -> None:
        if self.speedup <= 0:
            raise ValueError(f"speedup must be positive, not {self.speedup}")
        for name in (
            "prefill_base_s",
            "prefill_per_token_s",
            "prefill_per_pair_s",
            "decode_base_s",
            "decode_per_seq_s",
            "decode_per_ctx_token_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    def prefill_seconds(self, chunks: list[tuple[int, int]]) -> float:
        """Wall time of one prefill batch; ``chunks`` holds (tokens already in KV, new tokens)."""
        new_total = 0
        pairs = 0
        for cached, new in chunks:
            new_total += new
            pairs += new * cached + new * (new + 1) // 2
        gpu = (
            self.prefill_base_s
            + self.prefill_per_token_s * new_total
            + self.prefill_per_pair_s * pairs
        )
        return gpu / self.speedup

    def decode_seconds(self, batch_size: int, context_tokens: int) -> float:
        """Wall time of one decode step of ``batch_size`` requests."""
        gpu = (
            self.decode_base_s
            + self.decode_per_seq_s * batch_size
            + self.decode_per_ctx_token_s * context_tokens
        )
        return gpu / self.speedup
