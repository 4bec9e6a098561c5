"""The simulated worker's configuration: one typed object built once from the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field

from sglctl.sim.kv_events import KvEventsConfig
from sglctl.sim.timing import (
    DEFAULT_CHUNKED_PREFILL_SIZE,
    DEFAULT_CONTEXT_LENGTH,
    DEFAULT_KV_CACHE_TOKENS,
    DEFAULT_MAX_PREFILL_TOKENS,
    DEFAULT_MAX_RUNNING_REQUESTS,
    TimingModel,
)
from sglctl.sim.transfer import TransferModel

DEFAULT_MODEL_PATH = "sim/Llama-3.1-8B-Instruct"
DISAGGREGATION_MODES = ("null", "prefill", "decode")
DEFAULT_BOOTSTRAP_PORT = 8998  # SGLang's --disaggregation-bootstrap-port default
DEFAULT_DISAGGREGATION_TIMEOUT_S = 300.0


@dataclass
class SimConfig:
    """Everything a sim worker needs; validated in ``__post_init__`` so bad flags fail early."""

    host: str = "127.0.0.1"
    port: int = 30000
    model_path: str = DEFAULT_MODEL_PATH
    served_model_name: str | None = None
    tokenizer_path: str | None = None
    kv_cache_tokens: int = DEFAULT_KV_CACHE_TOKENS
    max_running_requests: int = DEFAULT_MAX_RUNNING_REQUESTS
    chunked_prefill_size: int = DEFAULT_CHUNKED_PREFILL_SIZE
    max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS
    context_length: int = DEFAULT_CONTEXT_LENGTH
    default_max_new_tokens: int = 128
    timing: TimingModel = field(default_factory=TimingModel)
    # The scheduler wakes at most once per tick while busy: several decode steps that end
    # inside one tick are delivered together (one streamed chunk), which keeps the CPU cost of
    # a fast (--speedup) worker bounded. Simulated timing stays exact; delivery lags <= 1 tick.
    min_tick_s: float = 0.002
    # SGLang's --stream-interval: a streamed chunk every N tokens (first and last always).
    stream_interval: int = 1
    crash_after: int | None = None
    error_rate: float = 0.0
    stall_after: int | None = None
    # PD disaggregation (sglctl.sim.disagg): SGLang's --disaggregation-mode and friends.
    disaggregation_mode: str = "null"
    bootstrap_port: int = DEFAULT_BOOTSTRAP_PORT
    disaggregation_timeout_s: float = DEFAULT_DISAGGREGATION_TIMEOUT_S
    transfer: TransferModel = field(default_factory=TransferModel)
    seed: int = 0
    #: SGLang's --page-size: the KV cache works in pages of this many tokens (events per page).
    page_size: int = 1
    #: SGLang's --kv-events-config JSON (sglctl.sim.kv_events); None: no events.
    kv_events_config: str | None = None
    tp_size: int = 1
    dp_size: int = 1
    log_level: str = "info"

    def __post_init__(self) -> None:
        positive = {
            "kv_cache_tokens": self.kv_cache_tokens,
            "max_running_requests": self.max_running_requests,
            "chunked_prefill_size": self.chunked_prefill_size,
            "max_prefill_tokens": self.max_prefill_tokens,
            "context_length": self.context_length,
            "tp_size": self.tp_size,
            "dp_size": self.dp_size,
            "stream_interval": self.stream_interval,
            "page_size": self.page_size,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, not {value}")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"--error-rate must be within [0, 1], not {self.error_rate}")
        for name in ("crash_after", "stall_after"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, not {value}")
        if self.disaggregation_mode not in DISAGGREGATION_MODES:
            raise ValueError(
                "--disaggregation-mode must be one of "
                f"{', '.join(DISAGGREGATION_MODES)}, not {self.disaggregation_mode!r}"
            )
        if not 0 < self.bootstrap_port < 65536:
            raise ValueError(
                "--disaggregation-bootstrap-port must be within 1..65535, "
                f"not {self.bootstrap_port}"
            )
        if self.disaggregation_mode == "prefill" and self.bootstrap_port == self.port:
            raise ValueError(
                f"--disaggregation-bootstrap-port {self.bootstrap_port} is also --port: give the "
                "bootstrap server a port of its own"
            )
        if self.disaggregation_timeout_s <= 0:
            raise ValueError(
                f"--disaggregation-timeout must be positive, not {self.disaggregation_timeout_s}"
            )
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be within 1..65535, not {self.port}")
        if self.min_tick_s < 0:
            raise ValueError("the scheduler tick must be >= 0")
        _ = self.kv_events  # a bad --kv-events-config fails here, with its message

    @property
    def kv_events(self) -> KvEventsConfig | None:
        """The parsed ``--kv-events-config`` (None when not given)."""
        if self.kv_events_config is None:
            return None
        return KvEventsConfig.from_json(self.kv_events_config)

    @property
    def kv_events_enabled(self) -> bool:
        config = self.kv_events
        return config is not None and config.enabled

    @property
    def model_name(self) -> str:
        """The name clients see (``model`` in OpenAI responses, ``model_name`` metric label)."""
        return self.served_model_name or self.model_path
