"""How long handing a prompt's KV cache from a prefill to a decode worker takes.

The model, per request (seconds of wall time)::

    t = (latency + prompt_tokens x kv_bytes_per_token x 8 / (link_gbps x 1e9)) / speedup

* **All prompt tokens are sent**, cached on the prefill side or not: the decode worker has
  none of them (SGLang's decode workers receive the whole prompt's KV, then decode).
* ``kv_bytes_per_token`` defaults to Llama-3.1-8B in BF16: 2 (K and V) x 32 layers x 8 KV
  heads x 128 head dim x 2 bytes = 131072 bytes (128 KiB) a token. For another model use
  ``2 x layers x kv_heads x head_dim x bytes_per_element`` (divide by the TP size when each
  rank sends its own shard over its own NIC).
* ``link_gbps`` defaults to 400 Gb/s: one ConnectX-7 NDR NIC per H100, the usual HGX layout
  that Mooncake / NIXL RDMA transfers use. 4096 tokens (512 MiB) then take ~10.7 ms.
* ``latency_ms`` (default 1 ms) is the per-transfer fixed cost: the bootstrap handshake, the
  RDMA registration and the completion poll SGLang's decode scheduler does.
* ``--speedup`` divides it like every other simulated time.

The prefill worker's flags decide (it is the sender and holds the connection while the bytes
"move"); give both workers the same flags to keep their reports consistent.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # Llama-3.1-8B BF16: 131072
DEFAULT_KV_LINK_GBPS = 400.0
DEFAULT_KV_TRANSFER_LATENCY_MS = 1.0


@dataclass(frozen=True)
class TransferModel:
    """Wall time of one KV hand-over (see the module docstring for the figures)."""

    kv_bytes_per_token: int = DEFAULT_KV_BYTES_PER_TOKEN
    link_gbps: float = DEFAULT_KV_LINK_GBPS
    latency_ms: float = DEFAULT_KV_TRANSFER_LATENCY_MS
    speedup: float = 1.0

    def __post_init__(self) -> None:
        if self.kv_bytes_per_token <= 0:
            raise ValueError(
                f"--kv-bytes-per-token must be positive, not {self.kv_bytes_per_token}"
            )
        if self.link_gbps <= 0:
            raise ValueError(f"--kv-link-gbps must be positive, not {self.link_gbps}")
        if self.latency_ms < 0:
            raise ValueError(f"--kv-transfer-latency-ms must be >= 0, not {self.latency_ms}")
        if self.speedup <= 0:
            raise ValueError(f"speedup must be positive, not {self.speedup}")

    def kv_bytes(self, tokens: int) -> int:
        return tokens * self.kv_bytes_per_token

    def seconds(self, tokens: int) -> float:
        """Wall seconds to move ``tokens`` tokens of KV over the link."""
        wire = self.kv_bytes(tokens) * 8 / (self.link_gbps * 1e9)
        return (self.latency_ms / 1e3 + wire) / self.speedup
